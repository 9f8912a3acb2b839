"""The lesson drivers: one module per lesson topic, each running that lesson's experiments and analysing them.

They sit above the engine (config, stack, booking, workflow, backends, worker, pool, events, lab, charts) and
use only its public calls, so a notebook cell is one call here: ``from labkit.lessons import crashes``.
The engine never imports a lesson. Two modules serve every lesson: ``figures`` prints a sentence from the
figures it states and shows an "Embedded broker" box's figure on both brokers, and ``brokers`` holds the small
probes of the Kafka broker in use that those boxes need.
"""
