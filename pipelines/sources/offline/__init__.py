"""ImageFolders built offline from images that ship inside packages: the digits demo set, the photo benchmark set."""
