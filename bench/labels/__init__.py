"""The label corpus and the offline tournament of label rules (issue 23 §3).

`python -m bench.labels record` records, once per task and seed, every member's answers to the public
set with every signal a candidate rule may read (bench/labels/corpus/); `python -m bench.labels score`
replays the shipped rules (coordinator.label_rules) and the candidates (bench/labels/rules/) on it in
seconds: label ROUGE-L against the references, the share of the gap between the members' mean and the
oracle it closes, and how often it chose the expert.
"""
