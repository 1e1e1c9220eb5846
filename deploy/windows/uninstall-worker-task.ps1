# Remove the log-on task of a tmrl worker.
param([string]$WorkerId = "worker-1")
Stop-ScheduledTask -TaskName "tmrl-worker-$WorkerId" -ErrorAction SilentlyContinue
Unregister-ScheduledTask -TaskName "tmrl-worker-$WorkerId" -Confirm:$false
