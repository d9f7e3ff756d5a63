"""Files of this checkout that the tests and the bench read: the example model, the shipped config, the tests' models.

The testkit and the bench run only in a checkout (`pip install -e .`), so the repository root is the
folder above testkit/.
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE_DIR = os.path.join(REPO, "examples", "custom_model")
EXAMPLE_MODEL = os.path.join(EXAMPLE_DIR, "model.py")
RESNET_MODEL = os.path.join(REPO, "examples", "resnet", "model.py")  # ResNet18 / ResNet50, torchvision's layout
SHIPPED_CONFIG = os.path.join(REPO, "config.properties")
SHIPPED_LOG_CONFIG = os.path.join(REPO, "log4j2.xml")  # every launcher's --log-config
TEST_MODELS = os.path.join(REPO, "tests", "models")
