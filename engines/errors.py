"""The armdi exception tree. Every error a user can cause derives from ``ArmdiError``.

    ArmdiError
    ├── ModelRepositoryError        a model repository is missing, unreadable or inconsistent
    │   ├── ModelNotFoundError      no manifest for this model id
    │   ├── ManifestError           manifest unreadable, wrong schema version
    │   └── ArtifactError           a file is missing, truncated or tampered with
    ├── EngineError                 an engine could not be loaded or run
    │   ├── BackendUnavailableError the backend's library is not installed on this machine
    │   └── InputSpecError          a tensor of the wrong shape or dtype was given to an engine
    ├── BuildError                  the builder could not turn a model into segments
    │   └── VerificationError       chained segments do not equal the full model
    └── (appliance/web errors derive from ArmdiError too)

``engines`` is the bottom layer, so the root of the tree lives here and the other packages
import it from here.
"""

from __future__ import annotations


class ArmdiError(Exception):
    """Base class of every error armdi raises on purpose. ``str(err)`` is one readable line."""


class ModelRepositoryError(ArmdiError):
    pass


class ModelNotFoundError(ModelRepositoryError):
    pass


class ManifestError(ModelRepositoryError):
    pass


class ArtifactError(ModelRepositoryError):
    pass


class EngineError(ArmdiError):
    pass


class BackendUnavailableError(EngineError):
    pass


class InputSpecError(EngineError):
    pass


class BuildError(ArmdiError):
    pass


class VerificationError(BuildError):
    pass
