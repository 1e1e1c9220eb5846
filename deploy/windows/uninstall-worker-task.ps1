# Remove the log-on task of a tmrl worker (and stop the worker it started).
param([string]$WorkerId = "worker-1")
$ErrorActionPreference = "Stop"
$name = "tmrl-worker-$WorkerId"
if (-not (Get-ScheduledTask -TaskName $name -ErrorAction SilentlyContinue)) { Write-Host "no task $name"; return }
Stop-ScheduledTask -TaskName $name
Unregister-ScheduledTask -TaskName $name -Confirm:$false
Write-Host "task $name removed"
