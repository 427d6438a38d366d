"""Pool sizing policy, the AWS applier and the replay simulator (issues 5 and 6). Never imports torch."""
