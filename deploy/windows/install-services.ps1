# Install the tmrl relay and/or trainer as Windows services (run in an elevated PowerShell).
#   .\install-services.ps1 -Venv C:\tmrl\.venv -Config C:\ProgramData\tmrl\tmrl.toml -Services relay,trainer
# The worker is NOT a service: see install-worker-task.ps1 for why.
param(
    [Parameter(Mandatory = $true)][string]$Venv,
    [Parameter(Mandatory = $true)][string]$Config,
    [string[]]$Services = @("relay", "trainer")
)
$ErrorActionPreference = "Stop"
$python = Join-Path $Venv "Scripts\python.exe"
$script = Join-Path $PSScriptRoot "tmrl_windows_service.py"
if (-not (Test-Path $python)) { throw "no python.exe in $Venv\Scripts: create the venv and install tmrl first" }
if (-not (Test-Path $Config)) { throw "config file $Config does not exist (start from deploy\tmrl.example.toml)" }
& $python -m pip install --quiet "pywin32>=306"
foreach ($service in $Services) {
    & $python $script $service install --config $Config
    & $python $script $service start
    Write-Host "tmrl-$service installed and started (Services console: 'tmrl $service')"
}
