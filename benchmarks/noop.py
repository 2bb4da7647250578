"""Imports torch and exits: what every launcher must pay for at least once per worker."""

import torch  # noqa: F401
