"""Experiments that train and measure: teacher forcing vs free running, and what detaching the hidden state saves."""
