"""The lesson drivers: one module per lesson topic, each running that lesson's experiments and analysing them.

They sit above the engine (config, stack, booking, workflow, backends, worker, pool, events, lab, charts) and
use only its public calls, so a notebook cell is one call here: ``from labkit.lessons import crashes``.
The engine never imports a lesson.
"""
