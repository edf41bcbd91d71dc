"""Multi-exit networks: the registry (AlexNet, ResNet-18, VGG-16, LeViT), exits on your own network, and the
code references that rebuild it."""

from dart_ee.models import levit as _levit  # noqa: F401  (registers the LeViT family in net's registry)
