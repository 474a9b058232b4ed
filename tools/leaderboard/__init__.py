"""Leaderboard tools: submissions, cross-validation metrics, post-processing choice, label efficiency."""
