"""What each actor's mailbox takes (`Mailbox[StorageMsg]`, ...): its protocol, in one place.

A request sent to a mailbox that does not take it is a type error; one that gets there all
the same is answered at once with a failure (mailboxes/dispatch.py).
"""

from __future__ import annotations

from anon_ticket.domain.commands import (
    Backup,
    Drain,
    FilterStats,
    HubStats,
    PausePoller,
    PollerStatus,
    RescanFrom,
    RestartActor,
    ResumePoller,
    Shutdown,
    StorageHealth,
    StorageStats,
    TreeStatus,
    WorkerMetrics,
)
from anon_ticket.domain.messages import (
    Acked,
    AddPids,
    AfterFeed,
    Attach,
    Claim,
    Committed,
    Confirmations,
    Detach,
    FeedSynced,
    ListSkipped,
    Lookup,
    LookupToken,
    MarkVanished,
    PaymentSeen,
    PollerPauseFlag,
    Publish,
    ReadCursor,
    ReadTicketState,
    RecentTransfers,
    RecordTransfers,
    Redeem,
    Replicated,
    Revoke,
    Settle,
    SightingGone,
)
from anon_ticket.domain.watch import Drop, Replay, Subscribe, Unsubscribe

StorageMsg = (Claim | LookupToken | Revoke | RecordTransfers | ReadCursor | PollerPauseFlag
              | RecentTransfers | MarkVanished | ReadTicketState | ListSkipped | StorageStats
              | StorageHealth | Backup
              # PostgreSQL: the poller's announcements, into the cluster feed in order (§9)
              | PaymentSeen | Confirmations | SightingGone)
FilterMsg = (Redeem | Lookup | AddPids | Committed | Replicated | Settle | FeedSynced
             | FilterStats)
ClusterMsg = AfterFeed  # a node's cluster actor (PostgreSQL, several nodes: §9)
HubMsg = (Publish | PaymentSeen | Confirmations | SightingGone | Subscribe | Unsubscribe | Drop
          | Replay | HubStats)
# The owner's fanout to its worker processes' links (docs/architecture.md §8)
FanoutMsg = (AddPids | Settle | Committed | PaymentSeen | Confirmations | SightingGone
             | FeedSynced | Attach | Detach | Acked)
WorkerMsg = WorkerMetrics | Drain  # a worker process's actor in the owner (actors/worker.py)
PollerMsg = PollerStatus | PausePoller | ResumePoller | RescanFrom
PublicMsg = Drain
SupervisorMsg = TreeStatus | RestartActor | Shutdown  # the root supervisor's commands
