"""The built-in demo (gradindex demo) and its small DDPM trainer on scikit-learn digits."""
