"""Models that know nothing of Flower: the embedded flow model, its attribute
classifier, and the segmentation U-Net."""
