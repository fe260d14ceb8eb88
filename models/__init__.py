"""Models: the registry, CIFAR ResNets, the dependency graph, widths, surgery, saved architectures.

Empty on purpose: importing ``latprune.models.widths`` must not import torch.
"""
