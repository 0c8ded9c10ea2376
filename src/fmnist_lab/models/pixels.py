"""What every network here takes: raw [0, 1] pixels [N, 1, 28, 28], standardized inside the network."""

# Mean and std of the FashionMNIST training pixels in [0, 1]; applied inside the model so every checkpoint
# and export takes raw pixels and a client needs no knowledge of them.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
