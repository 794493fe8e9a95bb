from .base import Backend, EventCallback, create_backend

__all__ = ["Backend", "EventCallback", "create_backend"]
