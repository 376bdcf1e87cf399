"""The bus runtime every stage runs in: the stage contract (re-exported here), the
job and session runners (``jobs``, ``sessions``, on ``worker``), the bus scripts
(``bus``), the cancel lane (``cancel``), the janitor and the key names (``keys``).

A stage imports the contract from here: ``from workers.runtime import Context, Emit,
JobStage``; a session stage ``SessionStage`` from ``workers.runtime.sessions``.
"""

from workers.runtime.contract import Context, Emit, Handler, JobStage, Outcome, RuntimeSettings

__all__ = ["Context", "Emit", "Handler", "JobStage", "Outcome", "RuntimeSettings"]
