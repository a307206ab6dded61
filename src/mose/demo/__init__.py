"""`mose demo`: the whole method end to end on a tiny Qwen2-VL and the procedural driving world.

A study (`mose.study`) of one seed: generate the world, pretrain a general
model on general questions about its scenes, rule-annotate a small labelled
subset, train MoSE and its two baselines from that same checkpoint with one
optimizer budget, evaluate all three on the test split, print the table and
sample answers with skill chains, and write OUT/results.json and OUT/report.html.

    from mose.demo import QUICK, run_demo
    results = run_demo("runs/demo", QUICK)
"""

from mose.demo.run import run_demo
from mose.demo.settings import DEFAULT, QUICK, DemoSettings

__all__ = ["DEFAULT", "QUICK", "DemoSettings", "run_demo"]
