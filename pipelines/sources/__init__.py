"""Where images come from: an ImageFolder (folder/), tar shards (shards/), the sets built offline (offline/)."""
