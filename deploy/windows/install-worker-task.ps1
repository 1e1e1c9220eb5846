# Start a tmrl worker at user log-on, in the user's interactive session (run as the user who plays the game).
#
# Why a scheduled task and not a service: Windows services run in session 0, which has no desktop. A worker there
# cannot capture the game window (dxcam's Desktop Duplication needs the user's desktop) nor drive the game with a
# virtual gamepad the game sees. A task triggered at log-on runs in the user's session with the user's desktop.
#   .\install-worker-task.ps1 -Venv C:\tmrl\.venv -Config C:\ProgramData\tmrl\tmrl.toml -WorkerId worker-1
param(
    [Parameter(Mandatory = $true)][string]$Venv,
    [Parameter(Mandatory = $true)][string]$Config,
    [string]$WorkerId = "worker-1"
)
$ErrorActionPreference = "Stop"
$exe = Join-Path $Venv "Scripts\tmrl-worker.exe"
if (-not (Test-Path $exe)) { throw "no tmrl-worker.exe in $Venv\Scripts: install tmrl first" }
$name = "tmrl-worker-$WorkerId"
# The worker id goes on the command line (not a user environment variable), so several worker tasks of one user
# (one per game instance, each with its own config and telemetry port) keep distinct ids.
$action = New-ScheduledTaskAction -Execute $exe -Argument "run --config `"$Config`" --worker-id $WorkerId" `
    -WorkingDirectory (Split-Path $Config)
$trigger = New-ScheduledTaskTrigger -AtLogOn -User $env:USERNAME
$principal = New-ScheduledTaskPrincipal -UserId $env:USERNAME -LogonType Interactive -RunLevel Limited
$settings = New-ScheduledTaskSettingsSet -RestartCount 99 -RestartInterval (New-TimeSpan -Minutes 1) `
    -ExecutionTimeLimit ([TimeSpan]::Zero) -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries
Register-ScheduledTask -TaskName $name -Action $action -Trigger $trigger -Principal $principal -Settings $settings `
    -Description "tmrl rollout worker $WorkerId (tmrl-worker run --config $Config --worker-id $WorkerId)" -Force | Out-Null
Write-Host "task $name registered: it starts at your next log-on (Start-ScheduledTask -TaskName $name to start now)"
