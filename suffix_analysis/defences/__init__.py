"""Defences read off the mechanism: hijacking suppression."""
