"""What is built from training and evaluation runs: ablation matrices, report pages, the demo, speed figures."""
