"""The fine-tuning library: everything the stages (stages/), the commands (commands/), the benchmarks and the
tests share. Each stage of dvc.yaml is a small entry point in stages/ that reads its params, calls these modules
and writes its outputs; finetune/paths.py names every file the stages exchange.
"""
