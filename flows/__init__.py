"""Processes built with the tracking framework."""
