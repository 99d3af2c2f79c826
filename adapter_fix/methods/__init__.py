"""Repair methods, one file each."""
