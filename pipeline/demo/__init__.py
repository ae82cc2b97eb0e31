"""The demo world: generated VOC-layout scenes and the one-command demo."""
