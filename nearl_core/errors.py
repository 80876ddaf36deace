"""Errors a user can cause.

Every problem that a person at a hospital can fix themselves (a bad path, a corrupt
image, a class folder nobody declared, a checkpoint for another backbone) is raised as
a :class:`NearlError` whose message is one line naming the file or value and what to
do.  The command-line entry points print that line and exit with status 2 instead of a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NearlError(Exception):
    """A problem the user can fix; the message is one readable line."""


class ConfigError(NearlError):
    """A configuration file or value is invalid."""


class DataError(NearlError):
    """A site data folder, manifest or image file is invalid."""


class AdapterFileError(NearlError):
    """An adapter file is missing, corrupt or made for another model or task."""


class BackboneError(NearlError):
    """The CLIP backbone cannot be built or its weights cannot be obtained."""


class ModelOutputError(NearlError):
    """A model gave NaN or infinite outputs: there is no prediction to report."""


class NearlWarning(UserWarning):
    """Something worth one line on stderr that does not stop the command."""


class UncheckedAdapterWarning(NearlWarning):
    """An adapter folder records no checksum (written before checksums), so it is loaded unchecked."""
