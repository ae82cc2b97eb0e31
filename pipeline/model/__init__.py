"""The network (plain PyTorch, no Ray, no I/O) and its weights: checkpoints, Caffe import, VGG-16 init."""
