"""The ResNets faceclr builds, by name: a fact a command line needs before it imports torch (its --help and
its argument errors stay fast)."""

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
"""Architecture -> width of its pooled features (the backbone's output)."""
