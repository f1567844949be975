"""``walship drill``: a restore drill that proves the disaster-recovery plan.

A drill restores a backup and the archived WAL into a scratch directory with the restore code
(:func:`walship.backup.restore.restore`, target action ``promote``, ``archive_mode = off``: the
scratch server never archives into the repository), starts PostgreSQL there on a free port
with its Unix socket inside the scratch directory and no TCP listener, waits until recovery
ends, runs the validation checks, stops the server and removes the scratch directory. It
measures, phase by phase, the backup fetch, WAL replay until consistent, until recovery ends and
until the first validation query is answered:

* **RTO** = drill start to the restored server answering the first validation query;
* **RPO** = how much committed work a disaster at drill time would lose: the drill's start
  minus the last transaction the drill recovered (``pg_last_xact_replay_timestamp()``; the
  backup's stop time when no transaction was replayed), reported with its derivation and the
  newest archived WAL's storage time.

What it promises:

* It never touches a running server: a port in use (TCP on 127.0.0.1 / ::1, or a socket in
  the usual socket directories) or a non-empty scratch directory is refused before anything
  is done. The scratch server runs with its own ``pg_hba.conf`` (trust, on its private socket
  only), ``listen_addresses = ''``, no ``primary_conninfo`` and no archiving.
* It never writes to the repository except its own result, ``drills/<UTC time>.<result>.json``
  (create-only, through the codec like every object).
* Nothing is left running nor in the scratch directory afterwards, after a failure or SIGTERM
  too (``keep`` leaves the directory, never a server).
* Exit statuses (mapped in :mod:`walship.errors`): 0 passed; ``DRILL_FAILED`` when the restore
  or a check failed; ``TARGET_MISSED`` when everything worked but the RTO or RPO target was
  missed.

The validation checks and targets come from the ``[drill]`` table of the config file
(:func:`parse_plan`) and the command line's flags.
"""

from walship.drill.plan import (
                                DEFAULT_INTERVAL,
                                DrillPlan,
                                SqlCheck,
                                describe_plan,
                                flag_check,
                                format_duration,
                                parse_duration,
                                parse_plan,
)
from walship.drill.report import (
                                DRILLS_PREFIX,
                                CheckResult,
                                DrillHistory,
                                DrillReport,
                                DrillStatus,
                                drill_history,
                                drill_status,
                                exit_for,
                                html_report,
                                human_summary,
                                prometheus_text,
                                store_result,
)
from walship.drill.run import DrillOptions, Interrupted, run_drill
from walship.drill.scratch import (
                                Runner,
                                Scratch,
                                choose_port,
                                make_scratch,
                                port_in_use,
                                remove_scratch,
)
from walship.errors import DrillFailed, TargetMissed

__all__ = ["DEFAULT_INTERVAL", "DRILLS_PREFIX", "CheckResult", "DrillFailed", "DrillHistory",
           "DrillOptions", "DrillPlan", "DrillReport", "DrillStatus", "Interrupted", "Runner",
           "Scratch", "SqlCheck", "TargetMissed", "choose_port", "describe_plan",
           "drill_history", "drill_status", "exit_for", "flag_check", "format_duration",
           "html_report", "human_summary", "make_scratch", "parse_duration", "parse_plan",
           "port_in_use", "prometheus_text", "remove_scratch", "run_drill", "store_result"]
