"""tidings: real-time notifications for apps — SSE and WebSocket push, exact resume, an inbox."""

from .auth import Principal
from .config import Settings
from .errors import TidingsError
from .hub import Hub
from .server import create_app

__version__ = "0.1.0"

__all__ = ["Hub", "Principal", "Settings", "TidingsError", "__version__", "create_app"]
