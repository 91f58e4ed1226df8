"""mmfuse: streaming multimodal fusion that keeps deciding when sensors drop out.

This package root holds what the daemon, the actors and the training side share:
the wire protocol (`mmfuse.wire`), the typed frames passed between actors
(`mmfuse.frames`), the model bundle format (`mmfuse.bundle`) and the model
definitions (`mmfuse.models`, `mmfuse.restorers`).
"""

__version__ = "0.1.0"

MODALITIES = ("audio", "visual", "text")
MAX_NAME_LEN = 256  # of a session or source name on the wire, which has no '/' (topics are modality/session)
