"""Runnable examples of fastrollout in a whole RL loop
(``python -m fastrollout.examples.rl_loop``)."""
