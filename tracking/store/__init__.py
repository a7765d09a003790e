"""The tracking store: ``Tracker`` (the facade) over one module per concept.

* ``catalog``: process definitions stored in the database.
* ``intake``: items in as transactions with their stages, deduplicated.
* ``claims``: finding and reserving work (overdue first, then by priority), starting and
  renewing it.
* ``leases``: giving reservations back; recovering the stages of dead runs.
* ``transitions``: attempt results and operator actions, decided by ``tracking.states``.
* ``batches``: many attempt results in one database transaction (``complete_many``,
  ``complete_batch``).
* ``reads``: transactions, stages and runnable work.
* ``retention``: purges of finished transactions (archived, deleted in chunks, audited).
* ``outbox``: business outcomes read from the audit trail past a cursor, for a sender
  (``tracking.prefect_events``); ``cursors``: who holds a cursor, where it is;
  ``horizon``: how far the audit trail is settled.
"""

from tracking.store.batches import Completion, RecordedAttempt
from tracking.store.claims import Reservation, Start
from tracking.store.intake import Intake
from tracking.store.sql import MAX_CLAIM
from tracking.store.tracker import Tracker

__all__ = ["MAX_CLAIM", "Completion", "Intake", "RecordedAttempt", "Reservation", "Start",
           "Tracker"]
