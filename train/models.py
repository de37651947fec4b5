"""The networks: ``cnn8`` of the official code (CIFAR-10) and the CIFAR ResNets
(ResNet-18; ResNet-34, the CIFAR-100 network of Ma et al.).

``build_model(name, num_classes)`` is the entry point; every model is returned
in channels_last memory format.
"""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("cnn8", "resnet18", "resnet34")
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CNN8(nn.Module):
    """8-layer CNN of Ma et al. for CIFAR-10.

    Three blocks of two 3x3 conv+BN+ReLU (64, 128, 196 channels), each followed
    by a 2x2 max-pool (32 -> 16 -> 8 -> 4), then FC 196*4*4=3136 -> 256, BN1d,
    ReLU, FC 256 -> classes.  Kaiming-uniform conv weights, Xavier-uniform
    linear weights; biases keep PyTorch's default initialisation.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        blocks = []
        for cin, cout in ((3, 64), (64, 128), (128, 196)):
            blocks += [_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout), nn.MaxPool2d(2, 2)]
        self.features = nn.Sequential(*blocks)
        self.fc1 = nn.Sequential(nn.Linear(196 * 4 * 4, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True))
        self.fc2 = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(torch.flatten(self.features(x), 1)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks, CIFAR variant: 3x3 stride-1 stem, no max-pool,
    stages of 64, 128, 256, 512 channels with ``blocks`` blocks each, global
    average pool, FC.  ResNet-18: (2, 2, 2, 2); ResNet-34: (3, 4, 6, 3).
    Initialised as the official code: Kaiming-uniform convolutions,
    Xavier-uniform FC weights."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for (cout, stride), count in zip(((64, 1), (128, 2), (256, 2), (512, 2)), blocks):
            layers += [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(count - 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh model ("cnn8", "resnet18" or "resnet34") for 3x32x32 inputs, in channels_last.

    Initialisation draws from torch's global RNG: seed it first for a
    reproducible model.
    """
    if name == "cnn8":
        model = CNN8(num_classes)
    elif name in RESNET_BLOCKS:
        model = ResNet(RESNET_BLOCKS[name], num_classes)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return model.to(memory_format=torch.channels_last)
