"""The exceptions phi_core raises for problems a user can fix.

Every message is one line that names the thing at fault (a file, a config field, a backend), so the CLI can
print it as it is.
"""

from __future__ import annotations


class PhiError(Exception):
    """Base class of every error phi_core raises on purpose."""


class CheckpointError(PhiError):
    """A checkpoint (folder, Hub repo, config.json, weights or tokenizer files) cannot be used."""


class ConfigError(CheckpointError):
    """A config value is unknown, missing or contradicts another one."""


class BackendUnavailableError(PhiError):
    """The attention backend asked for cannot run with this device, dtype or installation."""
