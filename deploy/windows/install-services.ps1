# Install the tmrl relay and/or trainer as Windows services (run in an elevated PowerShell, 5.1 or 7).
#   .\install-services.ps1 -Venv C:\tmrl\.venv -Config C:\ProgramData\tmrl\tmrl.toml -Services relay,trainer
# The worker is NOT a service: see install-worker-task.ps1 for why.
param(
    [Parameter(Mandatory = $true)][string]$Venv,
    [Parameter(Mandatory = $true)][string]$Config,
    [ValidateSet("relay", "trainer")][string[]]$Services = @("relay", "trainer")
)
$ErrorActionPreference = "Stop"

# $ErrorActionPreference does not cover native commands in Windows PowerShell 5.1: check every exit code. While one
# runs, "Continue": where 5.1 turns a native command's stderr into error records (ISE, redirection, remoting), a
# warning pip prints on stderr must not stop the script; the exit code decides.
function Invoke-Native {
    param([Parameter(Mandatory = $true)][string]$What, [Parameter(Mandatory = $true)][scriptblock]$Command)
    $ErrorActionPreference = "Continue"
    & $Command
    $code = $LASTEXITCODE
    $ErrorActionPreference = "Stop"
    if ($code -ne 0) { throw "$What failed (exit code $code); nothing after it was done" }
}

$identity = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $identity.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw "run this script from an elevated PowerShell (Run as administrator)"
}
if (-not (Test-Path -LiteralPath $Venv)) { throw "venv $Venv does not exist: create it and install tmrl first" }
if (-not (Test-Path -LiteralPath $Config)) { throw "config file $Config does not exist (start from deploy\tmrl.example.toml)" }
$Venv = (Resolve-Path -LiteralPath $Venv).Path       # relative paths: the services run elsewhere
$Config = (Resolve-Path -LiteralPath $Config).Path
$python = Join-Path $Venv "Scripts\python.exe"
$script = Join-Path $PSScriptRoot "tmrl_windows_service.py"
if (-not (Test-Path -LiteralPath $python)) { throw "no python.exe in $Venv\Scripts: create the venv and install tmrl first" }

Invoke-Native "pip install pywin32" { & $python -m pip install --quiet "pywin32>=306" }
# pywin32's post-install step (its README: "python Scripts/pywin32_postinstall.py -install"): run from an elevated
# prompt it copies pywintypes3XX.dll and pythoncom3XX.dll to System32, where a LocalSystem service finds them.
$postinstall = Join-Path $Venv "Scripts\pywin32_postinstall.py"
if (Test-Path -LiteralPath $postinstall) {
    Invoke-Native "pywin32 post-install" { & $python $postinstall -install -quiet }
} else {
    Invoke-Native "pywin32 post-install" { & $python -m pywin32_postinstall -install -quiet }
}

foreach ($service in $Services) {
    # Running again (an update): stop the service first, so its DLLs can be replaced and `start` does not fail with
    # 1056 (already running). pywin32's install updates a service that exists.
    $existing = Get-Service -Name "tmrl-$service" -ErrorAction SilentlyContinue
    if ($existing -and $existing.Status -ne "Stopped") {
        Stop-Service -Name "tmrl-$service"
        Write-Host "stopped tmrl-$service to update it"
    }
    # install also copies python3XX.dll and pywin32's DLLs next to pythonservice.exe (the venv root): with a per-user
    # Python, LocalSystem cannot load them from anywhere else and the service fails with error 1053.
    Invoke-Native "installing tmrl-$service" { & $python $script $service install --config $Config }
    Invoke-Native "starting tmrl-$service" { & $python $script $service start }
    $log = Join-Path (Split-Path $Config) "logs\tmrl-$service.log"
    try {
        (Get-Service -Name "tmrl-$service").WaitForStatus("Running", [TimeSpan]::FromSeconds(30))
    } catch {
        throw "tmrl-$service did not reach Running within 30 s: see the Windows Event Log (Application, source " +
            "tmrl-$service) and $log"
    }
    # pywin32 reports Running before the child starts: a config error (exit 2) stops the service seconds later
    Start-Sleep -Seconds 5
    if ((Get-Service -Name "tmrl-$service").Status -ne "Running") {
        throw "tmrl-$service stopped right after starting: its log $log says why (a config error exits 2)"
    }
    Write-Host "tmrl-$service installed and running (Services console: 'tmrl $service'; log: $log)"
}
