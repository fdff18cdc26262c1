"""Commands a user runs by hand, outside the DVC pipeline: `python -m commands.predict` (classify photos with the
trained model) and `python -m commands.compare` (every experiment side by side).
"""
