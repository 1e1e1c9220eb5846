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
if (-not (Test-Path -LiteralPath $Venv)) { throw "venv $Venv does not exist: install tmrl first" }
if (-not (Test-Path -LiteralPath $Config)) { throw "config file $Config does not exist (start from deploy\tmrl.example.toml)" }
$Venv = (Resolve-Path -LiteralPath $Venv).Path       # the task does not run in this folder: absolute paths only
$Config = (Resolve-Path -LiteralPath $Config).Path
$exe = Join-Path $Venv "Scripts\tmrl-worker.exe"
$pythonw = Join-Path $Venv "Scripts\pythonw.exe"     # no console window (python.exe would open one)
$supervisor = Join-Path $PSScriptRoot "tmrl_supervisor.py"
foreach ($needed in @($exe, $pythonw, $supervisor)) {
    if (-not (Test-Path -LiteralPath $needed)) { throw "$needed does not exist: install tmrl into $Venv first" }
}
$name = "tmrl-worker-$WorkerId"
$workDir = Split-Path $Config
$log = Join-Path $workDir "logs\$name.log"

# Task Scheduler's restart settings only retry a task that failed to start, never a worker that exited with an error:
# tmrl_supervisor.py keeps the worker running (restart after an error with a back-off of 5 s doubling to 60 s; not
# after exit 0 or exit 2, a config error) and appends its output to $log. The worker id goes on the command line (not
# a user environment variable), so several worker tasks of one user keep distinct ids.
$arguments = "`"$supervisor`" --log `"$log`" --cwd `"$workDir`" -- `"$exe`" run --config `"$Config`" --worker-id $WorkerId"
$action = New-ScheduledTaskAction -Execute $pythonw -Argument $arguments -WorkingDirectory $workDir
$trigger = New-ScheduledTaskTrigger -AtLogOn -User $env:USERNAME
$principal = New-ScheduledTaskPrincipal -UserId $env:USERNAME -LogonType Interactive -RunLevel Limited
# Priority 4 is normal (Task Scheduler's default, 7, is below normal): the worker must keep its real-time step next to
# the game, which runs at normal priority; above normal (2-3) could take CPU from the game itself and make it stutter.
$settings = New-ScheduledTaskSettingsSet -Priority 4 -MultipleInstances IgnoreNew -ExecutionTimeLimit ([TimeSpan]::Zero) `
    -RestartCount 3 -RestartInterval (New-TimeSpan -Minutes 1) -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries
Register-ScheduledTask -TaskName $name -Action $action -Trigger $trigger -Principal $principal -Settings $settings `
    -Description "tmrl rollout worker $WorkerId (tmrl-worker run --config $Config --worker-id $WorkerId; log $log)" `
    -Force | Out-Null
Write-Host "task $name registered: it starts at your next log-on (Start-ScheduledTask -TaskName $name to start now); log: $log"
