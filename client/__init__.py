"""fedmri ClientApp package (loaded by Flower as ``client.app:app``)."""
