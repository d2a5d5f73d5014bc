"""The bottom of the import graph: what every package shares and that imports none of them."""
