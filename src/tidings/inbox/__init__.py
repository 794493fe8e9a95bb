"""The persistent inbox: notification records, unread counts, paging, migrations.

    InboxService   store first, push second: what routes and `Hub.notify` call
    Inbox          the records on SQLAlchemy async (SQLite or PostgreSQL)
    schema         validation of what callers send (limits, paging, ids)
    migrations     the schema under Alembic: upgrade_to_head, is_up_to_date, ...
    commands       `tidings migrate` and `tidings inbox purge`

docs/inbox.md explains the model.
"""

from __future__ import annotations

from .schema import NewNotification, Query, new_notification
from .service import InboxService
from .store import Inbox

__all__ = ["Inbox", "InboxService", "NewNotification", "Query", "new_notification"]
