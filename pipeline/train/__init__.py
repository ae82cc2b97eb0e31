"""deeplab train: the paper's recipe on Ray Train (DDP)."""
