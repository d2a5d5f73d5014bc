"""An ImageFolder as a source: its one walk (listing.py) and the up-front image check (image_check.py)."""
