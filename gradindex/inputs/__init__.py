"""Reading what the user gives: training/query images, ids, checkpoints, LoRA, labels and captions, devices and CPU threads."""
