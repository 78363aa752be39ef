"""The agreement trap, in one place: do rollouts that went wrong settle into agreement with the
teacher, and does KAT cut them rather than correct ones?

- ``verdicts``: how a rollout is judged (a testbed task's line verifier, collatz or
  running_sum, or math grading plus a repetition rule);
- ``tasks``: what the testbed probes need to know about each line-verified task;
- ``check``: the testbed's probes (forced loops, KL after derailment, offline cut rates);
- ``testbed_check``: ``python -m kat_research.analysis.trap.testbed_check``, those probes on a
  testbed task's models (``make testbed-trap-check``; any student folder or checkpoint);
- ``analysis``: ``python -m kat_research.analysis.trap.analysis``, a training run's rollouts at
  two checkpoints against KAT's segments and cuts;
- ``smollm2``: ``python -m kat_research.analysis.trap.smollm2``, the same on a real pair
  (SmolLM2-135M-Instruct and its SFT'd first layers, on GSM8K);
- ``plot``: ``python -m kat_research.analysis.trap.plot``, a trap analysis's figure redrawn from
  its tables;
- ``planted`` / ``benchmark``: ``python -m kat_research.analysis.trap.benchmark``, KAT on
  synthetic traces with planted traps.
"""
