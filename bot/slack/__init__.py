"""replyclock's Slack side: the app's Slack plumbing and a local stand-in for Slack itself."""
