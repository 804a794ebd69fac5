"""The plan as data: `Plan`, its typed decision records, the effective state under the passes so far,
its JSON form (schema v2), and `verify_plan`. Imports only `memplan.ir` (and errors, units, files)."""
