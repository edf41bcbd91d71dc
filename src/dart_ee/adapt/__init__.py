"""Adaptation at deployment: the controller, its settings, how they are chosen and how it is measured."""
