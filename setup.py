"""The package's version is the bundle's: read from bundle/configs/metadata.json, the one place it is set
(`make version`); everything else is in setup.cfg."""

import json
import os

from setuptools import setup

METADATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundle", "configs", "metadata.json")

with open(METADATA, encoding="utf-8") as f:
    setup(version=json.load(f)["version"])
