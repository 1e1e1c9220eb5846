# Stop and remove the tmrl relay and trainer Windows services (elevated PowerShell).
param([Parameter(Mandatory = $true)][string]$Venv, [ValidateSet("relay", "trainer")][string[]]$Services = @("relay", "trainer"))
$ErrorActionPreference = "Stop"
$python = Join-Path (Resolve-Path -LiteralPath $Venv).Path "Scripts\python.exe"
$script = Join-Path $PSScriptRoot "tmrl_windows_service.py"
$failed = @()
foreach ($service in $Services) {
    if (-not (Get-Service -Name "tmrl-$service" -ErrorAction SilentlyContinue)) { Write-Host "tmrl-$service is not installed"; continue }
    $ErrorActionPreference = "Continue"  # native commands: their exit codes decide (see install-services.ps1)
    & $python $script $service stop     # fails when already stopped: not an error here
    & $python $script $service remove
    $code = $LASTEXITCODE
    $ErrorActionPreference = "Stop"
    if ($code -ne 0) { $failed += "tmrl-$service" } else { Write-Host "tmrl-$service removed" }
}
if ($failed.Count -gt 0) { throw "could not remove: $($failed -join ', ')" }
