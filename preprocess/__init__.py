"""Preprocessing: Beam jobs and the pure functions they map (ingest, Haar DWT, Mumford–Shah)."""
